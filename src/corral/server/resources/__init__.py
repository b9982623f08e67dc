"""The server's operations, one module per resource, each for one `Tenant`: what the routes
call, and all they call. Every id or name from a request goes through the tenant first."""
