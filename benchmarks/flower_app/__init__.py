"""A minimal Flower app (flwr 1.42) that moves the benchmark's arrays with Flower's transport.

It runs only inside the Flower virtual environment that benchmarks.peers creates (flwr pins
protobuf < 7, the project needs >= 7), so it imports flwr and numpy and nothing of the project.
"""
