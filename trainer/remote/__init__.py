"""checkpoint.remote: a run kept in object storage as well as on the local disk (README,
"Object storage"). `objects` is the store (fsspec: s3fs, gcsfs, any fsspec URL), `uploader`
the background thread that commits each local checkpoint there (files verified, manifest
last), `download` brings a run back onto a fresh machine and lets the tools read a remote
run. Nothing here is imported unless checkpoint.remote is set or a tool is given a URL."""
