"""An app module whose import fails."""

raise RuntimeError("boom while importing the app")
