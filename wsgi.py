from app import create_app

app = create_app()
# The service reconciles in the background; the CLI makes apps that do not.
app.extensions["reconciler"].start_in_background()
