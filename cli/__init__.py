"""The `nitrofusion` command line (generate, serve, export, train, eval): the application layer on top of the
core package (nitrofusion/), the server, the exporter and the trainer. It is the one place that hands the
exporter to the runtime's loader, so the core never imports export/."""
