"""The web console of the box: first-run wizard, admin console, user pages, client autoconfig."""
