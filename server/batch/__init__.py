"""OpenAI's Batch API (files and batches, durable in SQLite) and the offline batch runner."""
