"""``llmshearing search-shape``: enumerate the shapes that meet a budget, score them cheaply, keep the best."""
