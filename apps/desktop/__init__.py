"""The desktop example (Tk): `python -m apps.desktop [MODEL] [--image I]` (MODEL defaults to the
built-in demo model); see app.py."""

# The default token limit per answer: a segment object is 4 <loc> + 16 <seg> tokens plus its
# label and " ;" (~23 tokens), so 96 fits three masks with room (64 cut the third off).
MAX_TOKENS = 96

# The text field's content per task when the task is picked; with the built-in demo model the
# object names are the kinds it knows (pg_edge.demo.shapes.KINDS).
DEFAULT_TEXT = {"caption": "en", "ask": "what is in the image?", "detect": "cat", "segment": "cat"}
DEMO_TEXT = {**DEFAULT_TEXT, "detect": "circle ; square ; triangle", "segment": "circle ; square ; triangle"}


def defaults_for(model: str) -> dict:
    """DEMO_TEXT for the built-in demo model, DEFAULT_TEXT for any other."""
    return DEMO_TEXT if model == "demo" else DEFAULT_TEXT
