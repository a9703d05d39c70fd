"""Developer tooling, not part of the runtime: throwaway PostgreSQL servers for the demo and the tests."""
