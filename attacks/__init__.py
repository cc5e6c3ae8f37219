"""The adversary: attacks that see only what a run shared (decoders, specs) and candidate records."""
