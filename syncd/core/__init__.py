"""The pure core of syncd: no I/O, no clocks, no environment. Time and randomness are arguments."""
