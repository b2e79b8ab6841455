"""The trained tiny demo model: the shapes it is taught to draw, the classifier that checks them, its build."""
