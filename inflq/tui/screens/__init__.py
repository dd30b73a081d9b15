"""Screens pushed over the main screen: modals (confirm, input, error, help), one sequence in
detail, and the maintenance tools (validate, relink, trust). Screens never import panes."""
