"""Tools around the pipeline: importers of public and your own data, the synthetic-world
generator, SQL over the tables, retrieval, status and the demo."""
