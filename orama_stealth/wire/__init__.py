"""Sans-IO protocol code: bytes in, values out. No sockets, no clocks, no event loop."""
