"""Client dialects: parse a client's request into canonical types, render events back."""
