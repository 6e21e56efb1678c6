"""The desktop example (Tk): `python -m apps.desktop MODEL [--image I]`; see app.py."""
