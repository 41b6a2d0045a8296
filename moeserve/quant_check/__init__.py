"""`moeserve check-quant`: the accuracy gate of a quantized model against its unquantized reference (per-token
KL divergence under teacher forcing, top-1 agreement, greedy-sequence agreement), with a PASS/FAIL verdict."""
