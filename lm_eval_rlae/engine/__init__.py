"""The ensemble engine: members and their KV caches, byte-exact vocabularies and their union,
UTF-8 bookkeeping, chat rendering, and the fusion of members' distributions (generation and scoring)."""
