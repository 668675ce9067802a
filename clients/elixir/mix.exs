defmodule LMPort.MixProject do
  use Mix.Project

  # No dependencies on purpose: the msgpack codec is LMPort.Msgpack, so the client builds offline.
  def project do
    [
      app: :lmport,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      deps: [],
      description: "Elixir client for the lmport inference worker (msgpack over an Erlang Port)",
      docs: [main: "LMPort", extras: ["README.md"]]
    ]
  end

  def application do
    [extra_applications: [:logger], mod: {LMPort.Application, []}]
  end
end
