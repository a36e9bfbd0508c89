"""The brainseg web app (streamlit_app.py)."""
