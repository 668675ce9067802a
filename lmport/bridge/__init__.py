"""Everything that reaches the engine from outside: wire protocol, stdio worker, service, shim, HTTP server, codegen."""
