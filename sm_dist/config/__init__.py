"""The job: one typed schema composed of each component's section, read from YAML with
command-line overrides, validated with every error at once; and building a job's parts."""
