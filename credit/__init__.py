"""From a PD to a lending decision: the credit policy, limits per product, the decision on a request and the
strategy tables (approval rate, cut-offs, profit)."""
