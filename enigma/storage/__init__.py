"""Writing safely: the run's storage (a local or NFS path, ``s3://``, ``gs://``), locks that name
their holder, and atomic replacement of a whole directory."""
