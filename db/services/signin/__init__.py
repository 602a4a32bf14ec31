"""The ways in, each its own module, and the one place they all hand over to
(conclusion.py): see db/services/auth.py for the layout."""
