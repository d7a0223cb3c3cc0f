"""The relay: one pipeline for every model call (parse → admit → route → call → render → settle)."""
