#!/usr/bin/perl
# Writes a Maildir++ tree as a delivery agent would, for the benchmarks: BOXES mailboxes (INBOX,
# Sent, Drafts, Trash, Archive, Archive.2015..2024, then Lists.listN), MAILS mails of MIN to
# MAX bytes (log-uniform), two thirds \Seen, some flagged, answered or with keywords, all in
# cur/ with their flags and S=/W= sizes in the name. Deterministic (fixed seed), no index of
# any tool. Run it as the mail user. GEN_HOST (default "bench") is the host part of the file
# names (the mails' GUIDs): another host gives mails unrelated to the default's.
#
#   gen-maildir.pl ROOT MAILS BOXES [MIN MAX]      (MIN, MAX default 1024, 102400)
use strict;
use warnings;

my ($root, $mails, $boxes, $min, $max) = @ARGV;
my $host = $ENV{GEN_HOST} // "bench";
die "GEN_HOST must be a word\n" unless $host =~ /^\w+$/;
die "usage: gen-maildir.pl ROOT MAILS BOXES [MIN MAX]\n" unless defined $boxes;
$min //= 1024;
$max //= 102400;
my @names = ("INBOX", "Sent", "Drafts", "Trash", "Archive");
push @names, map { "Archive.$_" } 2015 .. 2024;
my $i = 0;
while (@names < $boxes) { push @names, "Lists.list" . $i++ }
splice @names, $boxes;
my $seed = 12345;
my $rand = sub { $seed = ($seed * 1103515245 + 12345) % 2147483648; $seed / 2147483648 };
my @words = map { join "", map { chr(97 + int($rand->() * 26)) } 1 .. (2 + $_ % 9) } 1 .. 2000;
mkdir $root, 0700;
for my $b (@names) {
  my $d = $b eq "INBOX" ? $root : "$root/.$b";
  mkdir $d, 0700;
  mkdir "$d/$_", 0700 for qw(cur new tmp);
  if ($b ne "INBOX") { open my $f, ">", "$d/maildirfolder" or die; close $f }
  open my $k, ">", "$d/dovecot-keywords" or die;
  print $k "0 \$Forwarded\n1 Work\n";
  close $k;
}
open my $s, ">", "$root/subscriptions" or die;
print $s "$_\n" for grep { $_ ne "INBOX" } @names;
close $s;
for my $n (1 .. $mails) {
  # INBOX takes a quarter, the rest is spread over the other mailboxes.
  my $b = ($rand->() < 0.25 || @names == 1) ? "INBOX" : $names[1 + int($rand->() * (@names - 1))];
  my $d = $b eq "INBOX" ? $root : "$root/.$b";
  my $size = int(exp(log($min) + $rand->() * (log($max) - log($min))));
  my $body = "From: sender$n\@example.org\nTo: user\@example.org\nSubject: mail $n "
    . join(" ", map { $words[int($rand->() * @words)] } 1 .. 6)
    . "\nMessage-ID: <$n.bench\@example.org>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\n\n";
  my $line = "";
  while (length($body) < $size) {
    $line .= $words[int($rand->() * @words)] . " ";
    if (length($line) > 70) { $body .= "$line\n"; $line = "" }
  }
  my $flags = "";
  $flags .= "a" if $rand->() < 0.05;    # $Forwarded
  $flags .= "b" if $rand->() < 0.05;    # Work
  $flags .= "F" if $rand->() < 0.05;
  $flags .= "R" if $rand->() < 0.1;
  $flags .= "S" if $rand->() < 0.66;
  my $vsize = length($body) + ($body =~ tr/\n//);
  my $name = sprintf("%d.M%dP1.%s,S=%d,W=%d:2,%s", 1700000000 + $n, $n, $host, length($body), $vsize, $flags);
  open my $f, ">", "$d/cur/$name" or die "$d/cur/$name: $!";
  print $f $body;
  close $f;
  utime 1700000000 + $n, 1700000000 + $n, "$d/cur/$name";
}
