"""Modal dialogs: confirmation, text input, errors, help, export."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from ..compact import CButton, CInput


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no; nothing is deleted without it."""

    BINDINGS = [Binding("escape", "no", "Cancel"), Binding("y", "yes", "Yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield CButton("Yes (y)", variant="error", id="yes")
                yield CButton("No (esc)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


class InputScreen(ModalScreen[str | None]):
    """Ask for one line of text (a name, a path). Enter accepts, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, prompt: str, value: str = "", placeholder: str = "", message: str = "") -> None:
        super().__init__()
        self.prompt, self.value, self.placeholder, self.message = prompt, value, placeholder, message

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.prompt, classes="question")
            if self.message:
                yield Static(self.message, classes="error-text")
            yield CInput(self.value, placeholder=self.placeholder, id="answer")
            with Horizontal(classes="buttons"):
                yield CButton("OK (enter)", variant="primary", id="ok")
                yield CButton("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#answer", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one("#answer", Input).value if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ErrorScreen(ModalScreen[None]):
    """A problem and what to do about it. The app stays usable underneath."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("enter", "close", "Close", show=False)]

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.title_text, self.message = title, message

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error"):
            yield Label(self.title_text, classes="question")
            with VerticalScroll(classes="message"):
                yield Static(self.message, id="error-message", markup=False)
            with Horizontal(classes="buttons"):
                yield CButton("Close (esc)", variant="primary", id="close")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


HELP = """\
[b]Everywhere[/b]
  1-7     tabs: Investigations Query Run Results Distrib Probes Compare
  ctrl+p  command palette (actions by name)   ?  this help
  o       open another project                q  quit
  f       factor sets: spectra against the damping (esc back)
  ctrl+t  light / dark theme    esc  leave a text field (the tab's keys,
          the digits and single letters then work)
  ctrl+p  also: Validate estimators · Saved validations · Relink model
          or corpus · Trust local plugins · Export result set

[b]Investigations[/b] enter select · n new · r rename · d delete (asks first)
[b]Query[/b]     enter select · ctrl+s add query · ctrl+l what the model says
            (with a gradient index: the top sequences as you type; ctrl+g exact scores)
[b]Run[/b]       ctrl+r start · ctrl+b cancel · ctrl+y resume (the highlighted
            unfinished run, else the latest; after a cancel: that run)
[b]Results[/b]   enter (or click the highlighted row) open sequence
            t/b top/bottom · / search (enter: back) · n/p page · e export
[b]Sequence[/b]  i self-influence · ctrl+s save tag/note · esc back
[b]Probes[/b]    ctrl+s add the probe and score all probes
[b]Compare[/b]   ctrl+s compare two result sets on the current query
[b]Factors[/b]   ↑↓ a set's spectra · d remove (asks first)
[b]Validate[/b]  ctrl+r start · ctrl+b cancel · ctrl+l saved validations · esc back

Scores: positive (red) = the training sequence makes the completion
more likely; negative (blue) = less likely.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "close", "Close"), Binding("question_mark", "close", "Close"), Binding("q", "close", "Close", show=False)]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Static("inflq keys", classes="question")
            yield Static(HELP, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
