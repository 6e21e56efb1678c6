"""The desktop example (Tk): `python -m apps.desktop [MODEL] [--image I]` (MODEL defaults to the
built-in demo model); see app.py."""
