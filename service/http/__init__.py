"""The HTTP API: the app factory, middleware, problems, and one module of handlers per API area."""
