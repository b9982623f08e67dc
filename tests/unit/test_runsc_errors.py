"""What a tenant is told when runsc fails: its error, never a Go panic's traces."""

from __future__ import annotations

from corral.runtimes.gvisor import SUMMARY, failure_summary

PANIC = (
    "checkpoint failed: encoding error: bad object\n"
    "for object ?, 0x0?})\n"
    "\tgvisor.dev/gvisor/pkg/state/encode.go:775 +0x46e\n"
    "gvisor.dev/gvisor/pkg/state.Save.func1()\n"
    "\tgvisor.dev/gvisor/pkg/state/state.go:104 +0x98\n"
)
GOROUTINES = "panic: runtime error\n\ngoroutine 1 [running]:\nmain.f(0xc000c64c20)\n\tf.go:3 +0x1\n"


def test_a_plain_error_is_kept() -> None:
    assert failure_summary("  urpc method failed: EOF\n") == "urpc method failed: EOF"


def test_a_panic_keeps_its_message_not_its_traces() -> None:
    assert failure_summary(PANIC) == "checkpoint failed: encoding error: bad object"
    assert failure_summary(GOROUTINES) == "panic: runtime error"
    assert "0xc000" not in failure_summary(GOROUTINES)


def test_a_long_error_is_cut() -> None:
    summary = failure_summary("x" * (SUMMARY * 3))
    assert len(summary) < SUMMARY + 10 and summary.endswith("[...]")
