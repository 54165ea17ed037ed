"""convnext-serve serving side: Ray Serve application, gateway, runtime, metrics and the CLI."""
