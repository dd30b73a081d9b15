"""The inflq terminal UI (Textual): one client of the headless core. Start it with
:func:`inflq.tui.app.run_tui`. Nothing outside this package imports Textual."""
