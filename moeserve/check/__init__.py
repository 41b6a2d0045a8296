"""`moeserve check`: the pre-promotion checklist, automated against a running server (client side only)."""
