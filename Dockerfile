# One image for the server, the agent and the demo workload.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
# torch CPU build for the demo's lab; a GPU node running only the agent needs `pip install .` alone.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir '.[server,torch]'
ENV TAILSCOPE_HOST=0.0.0.0
EXPOSE 4318 4317
ENTRYPOINT ["tailscope"]
CMD ["serve"]
