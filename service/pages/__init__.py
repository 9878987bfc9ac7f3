"""Pages for people: templates, stylesheets, scripts and the charts drawn on the server."""
