"""Where things are, from any test folder."""
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
DATA = TESTS / "data"
RECIPES = REPO / "export_recipes"
DOCS = REPO / "docs"
