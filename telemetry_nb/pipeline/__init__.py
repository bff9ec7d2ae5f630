"""Moving data: the stream-entry codec, Redis Streams operations, the streamer and the collector."""
