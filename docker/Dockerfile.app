# The compose mesh's demo service (examples/mesh_app.rs), static, on `scratch`.
FROM scratch
COPY mesh_app /mesh_app
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/mesh_app"]
