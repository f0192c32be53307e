"""Testing kit: tiny seeded models of each family, input builders and the exactness oracles."""
