"""The application layer between the library (layers, models, weights, data) and the commands."""
