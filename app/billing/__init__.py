"""Money: prices and estimates (pure, exact decimals), limits, reservations and the ledger."""
