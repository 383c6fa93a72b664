"""The command-line front end: parsing and printing only; the library does the work."""
