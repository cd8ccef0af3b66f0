"""The OpenAI-compatible FastAPI service and the `searchagent` command line."""
