"""Runtime custom ops that converted graphs call (registered under the `rewriter::` namespace)."""
