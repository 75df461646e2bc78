"""Routes, thin: parse the request, call the services, render a template."""
