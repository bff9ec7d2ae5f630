"""Where samples come from: DCGM CSV exports and the synthetic generator."""
