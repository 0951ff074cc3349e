"""Shared machinery of the jobs: where state lives (settings), atomic writes and the date layout
(io), locks, the publication commit protocol and its online-store backends, the gate's verdict and
suites, and the readers of what the steps wrote (history, vocab, published)."""
