"""Previews: a port of a sandbox at a URL (see docs/previews.md).

gateway   routing (by host name or by path), tokens, cookies, error pages
proxy     one HTTP/1.1 request relayed over a port connection through the sandbox's agent
grants    who may use which preview (cached for a few seconds)
store     the previews table
"""
