"""Reports on run directories: summaries, tables and plots (`sm-dist report`), and grids of
runs compared (`sm-dist compare`)."""
