"""Tool calling on chat: the grammar that forces a call, and turning the output into tool_calls."""
