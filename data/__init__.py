"""Data: ingest, shards, decoding, transforms, the streaming pipeline, synthetic physics clips."""
