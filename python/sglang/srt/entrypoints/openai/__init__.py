"""OpenAI-compatible API: request/response models, serving logic, and `register_openai_routes`."""
